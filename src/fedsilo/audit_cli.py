"""``fedsilo audit``: an empirical privacy audit of one site's DP-SGD in one training run
(Steinke, Nasr & Jagielski, NeurIPS 2023; see docs/audit.md).

Light at import (``fedsilo.cli`` builds its parser from here): the run itself
(``privacy/canaries.py``: torch, Opacus) and the maths (``privacy/audit.py``: scipy) load
only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fedsilo.errors import ConfigError

#: exit status when the audit finds ε_lb above the reported ε
VIOLATION_EXIT = 1


def add_parser(sub: Any) -> None:
    """Add ``audit`` to the ``fedsilo`` subcommands ``sub``."""
    audit = sub.add_parser(
        "audit", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="empirical privacy audit: train one site's DP-SGD with canaries, report the "
             "epsilon lower bound next to the reported epsilon",
        description="Train one site's DP-SGD (fedsilo's own engine: Poisson sampling, "
                    "clipping, secret Gaussian noise) with gradient canaries, each included "
                    "with probability 1/2, guess from the noisy steps which were in, and turn "
                    "the correct guesses into an empirical lower bound on epsilon at the "
                    "given confidence (Steinke, Nasr & Jagielski, 'Privacy auditing with one "
                    "(1) training run', NeurIPS 2023). A lower bound above the reported "
                    "epsilon proves the DP-SGD broken; the exit status is then "
                    f"{VIOLATION_EXIT}. See docs/audit.md.")
    audit.add_argument("--config", metavar="CFG.yaml", default=None,
                       help="training configuration (data.dir, model, train.*, dp.*); "
                            "dp.enabled must be true")
    audit.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append",
                       default=[], help="override a config key (repeatable)")
    audit.add_argument("--site", type=int, default=0, metavar="K",
                       help="the site of the shard set to train")
    audit.add_argument("--canaries", type=int, default=1000, metavar="M",
                       help="number of canaries (one model coordinate each)")
    audit.add_argument("--steps", type=int, default=None, metavar="T",
                       help="train T DP-SGD steps, sigma planned for them (default: the "
                            "config's rounds x steps per round, as fedsilo train)")
    audit.add_argument("--score", choices=["lr", "sum"], default="lr",
                       help="canary score: log-likelihood ratio, or the summed steps")
    audit.add_argument("--confidence", type=float, default=0.95,
                       help="confidence of the lower bound")
    audit.add_argument("--seed", type=int, default=None,
                       help="seed of the canaries' places, inclusion and sampling "
                            "(default: fresh; the DP noise is always the site's secret)")
    audit.add_argument("--out", metavar="FILE.json", default=None,
                       help="also write the result as JSON to this new file (never "
                            "overwritten)")
    audit.add_argument("--json", action="store_true", default=False,
                       help="print the result as JSON")
    audit.add_argument("--debug-noise-scale", type=float, default=1.0, metavar="F",
                       help="FOR TESTING THE AUDIT ONLY: draw noise of sigma*F while "
                            "epsilon is still reported for sigma (F=0.1: a broken run)")
    audit.add_argument("--debug-public-seed", action="store_true", default=False,
                       help="FOR TESTING THE AUDIT ONLY: draw the noise from a secret "
                            "derived from config.seed, which the auditor regenerates and "
                            "subtracts (a broken run)")
    audit.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedsilo.config import load_config

    out = None if args.out is None else output_path(args.out)
    if args.canaries < 1:
        raise ConfigError(f"--canaries must be at least 1, got {args.canaries}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence must be in (0, 1), got {args.confidence}")
    if not (math.isfinite(args.debug_noise_scale) and args.debug_noise_scale > 0):
        raise ConfigError(f"--debug-noise-scale must be > 0, got {args.debug_noise_scale}")
    config = load_config(args.config, overrides=args.overrides)
    if not config.dp.enabled:
        raise ConfigError("fedsilo audit audits DP-SGD, and the configuration has "
                          "dp.enabled: false; add --set dp.enabled=true")
    from fedsilo.privacy.canaries import run_canary_audit

    result = run_canary_audit(config, site=args.site, num_canaries=args.canaries,
                              steps=args.steps, seed=args.seed, score=args.score,
                              confidence=args.confidence, noise_scale=args.debug_noise_scale,
                              public_seed=args.debug_public_seed)
    if out is not None:
        with open(out, "x", encoding="utf-8") as handle:  # "x": never overwrite
            json.dump(result, handle, indent=2)
            handle.write("\n")
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return VIOLATION_EXIT if result["violation"] else 0


def format_result(r: dict[str, Any]) -> str:
    """The result as a few lines for a terminal."""
    lines = [
        f"site {r['site']} ({r['num_samples']} training samples), {r['model']}: "
        f"{r['steps']} DP-SGD steps at q = {r['sample_rate']:.4g}, sigma = "
        f"{r['noise_multiplier']:.4g}, C = {r['max_grad_norm']:g}; {r['num_canaries']} "
        f"canaries ({r['canaries_in']} in)",
        f"reported epsilon  = {r['reported_epsilon']:.3f} (delta = {r['delta']:g}, "
        f"{r['accountant']} accountant)",
        f"empirical epsilon >= {r['epsilon_lb']:.3f} at {100 * r['confidence']:g}% confidence "
        f"({r['num_correct']} of {r['num_guesses']} guesses correct; k+ = {r['k_plus']}, "
        f"k- = {r['k_minus']}, best of {r['tries']}, {r['score']} score)",
        f"noise measured at the canaries: sigma = {r['measured_noise_multiplier']:.4g} "
        f"(claimed {r['noise_multiplier']:.4g})",
    ]
    if r["debug_noise_scale"] != 1.0 or r["debug_public_seed"]:
        lines.append(f"DEBUG FAULTS ON: noise scale {r['debug_noise_scale']:g}, public seed "
                     f"{r['debug_public_seed']} (this run is broken on purpose)")
    lines.append("VIOLATION: the empirical lower bound exceeds the reported epsilon"
                 if r["violation"] else
                 "no violation found: the lower bound is within the reported epsilon")
    lines.append(f"time: {r['seconds']:.1f} s ({r['train_seconds']:.1f} s training)")
    return "\n".join(lines)


def output_path(path: str) -> Path:
    """``path`` for a new JSON record: refused if something is there already."""
    out = Path(path)
    if out.exists():
        raise ConfigError(f"--out {path} already exists: fedsilo audit never overwrites a "
                          f"record; give a new path")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {path}: the directory {out.parent} does not exist")
    return out
