"""``python -m tests.bench``: see ``tests.bench.runner``; ``python -m tests.bench transports``: see
``tests.bench.transports``; ``python -m tests.bench dashboards``: see ``tests.bench.dashboards``;
``python -m tests.bench observe``: see ``tests.bench.observe``."""

import sys

if sys.argv[1:2] == ["transports"]:
    from tests.bench.transports import main

    sys.exit(main(sys.argv[2:]))

if sys.argv[1:2] == ["dashboards"]:
    from tests.bench.dashboards import main as dashboards_main

    sys.exit(dashboards_main(sys.argv[2:]))
if sys.argv[1:2] == ["observe"]:
    from tests.bench.observe import main

    sys.exit(main(sys.argv[2:]))

from tests.bench.runner import main

sys.exit(main())
