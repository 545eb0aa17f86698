import sys

from janus_lab.stack.cli import main

sys.exit(main())
