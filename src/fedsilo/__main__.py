import sys

from fedsilo.cli import main

sys.exit(main())
