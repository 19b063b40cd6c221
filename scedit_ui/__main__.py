import sys

from scedit_ui.cli import main

sys.exit(main())
