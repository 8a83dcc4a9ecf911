import sys

from geomirror.cli import main

sys.exit(main())
