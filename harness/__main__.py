from harness.run import process
from harness.train import main

process.freeze_imports()
raise SystemExit(main())
