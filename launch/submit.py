#!/usr/bin/env python
"""Submit medlava stages: `python launch/submit.py STAGE --config FILE [options] [key=value ...]`.

A thin shim over `medlava submit` (medlava.cluster.submit), which holds the launcher; `--help` shows its options.
"""

import sys

from medlava.cluster.submit import main

if __name__ == "__main__":
    sys.exit(main())
