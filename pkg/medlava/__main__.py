import sys

from medlava.cli import main

sys.exit(main())
