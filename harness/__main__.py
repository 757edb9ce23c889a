from harness.train import main

raise SystemExit(main())
