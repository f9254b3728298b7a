from fedimaging.cli import main

raise SystemExit(main())
