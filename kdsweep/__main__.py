from kdsweep.cli import main

raise SystemExit(main())
