from testpulse.cli import main

raise SystemExit(main())
