"""runtime.defer_dynamo_import: an optimizer without torch._dynamo, and torch's own path
back as soon as something imports it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = r"""
import json, sys
import torch
from fedsilo.config import TrainConfig
from fedsilo.runtime import defer_dynamo_import
from fedsilo.training import make_optimizer

deferred = defer_dynamo_import() if sys.argv[1] == "defer" else []
if sys.argv[1] != "defer":  # torch's own optimizers, as a user would build them
    import fedsilo.training as T
    T._SGD, T._Adam = torch.optim.SGD, torch.optim.Adam
found = {"deferred": deferred}
for name in ("sgd", "adam"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = make_optimizer(model, TrainConfig(optimizer=name, lr=0.1, momentum=0.9))
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(5, 4)).square().sum().backward()
        opt.step()
    state = opt.state_dict()
    opt.load_state_dict(state)
    found[name] = [float(v) for v in torch.nn.utils.parameters_to_vector(model.parameters())]
found["dynamo"] = "torch._dynamo" in sys.modules
found["sympy"] = "sympy" in sys.modules
if sys.argv[1] == "defer":  # once torch._dynamo is imported, torch's own path again
    import torch._dynamo
    opt.zero_grad()
    fn = torch.optim.Optimizer.zero_grad.__wrapped__
    found["after"] = getattr(fn.__dynamo_disable, "__module__", "")
print(json.dumps(found))
"""


def _probe(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_optimizers_run_without_importing_dynamo_and_train_alike():
    deferred, plain = _probe("defer"), _probe("plain")
    # a torch that renamed the hook would leave nothing deferred: the start-up cost is back
    assert deferred["deferred"] == ["add_param_group", "zero_grad", "state_dict",
                                    "load_state_dict"]
    assert not deferred["dynamo"] and not deferred["sympy"]
    assert plain["dynamo"]  # what the deferral saves: torch imports it otherwise
    assert deferred["sgd"] == plain["sgd"] and deferred["adam"] == plain["adam"]
    assert deferred["after"].startswith("torch._dynamo")
