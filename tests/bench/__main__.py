"""``python -m tests.bench``: see ``tests.bench.runner``; ``python -m tests.bench transports``: see
``tests.bench.transports``."""

import sys

if sys.argv[1:2] == ["transports"]:
    from tests.bench.transports import main

    sys.exit(main(sys.argv[2:]))

from tests.bench.runner import main

sys.exit(main())
