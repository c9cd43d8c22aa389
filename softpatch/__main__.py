import sys

from softpatch.cli import main

sys.exit(main())
