"""``python -m gateway.simulator --port 9100 --config sim.yaml``"""

import sys

from .cli import main

sys.exit(main())
