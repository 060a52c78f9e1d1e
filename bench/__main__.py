"""`python -m bench [--smoke] [--size 1G] [--runs 3] [--out DIR]`: see bench/harness.py."""

import sys

from bench.harness import main

sys.exit(main())
