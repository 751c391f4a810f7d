import sys

from compress.app.cli import main

sys.exit(main())
