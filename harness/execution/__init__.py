"""Running studies: the driver loop and its plans, status and dry-run text, suites, the trial
lifecycle, jobs (job side) and executors (driver side), workers, storage and the Optuna adapter.
No torch at module level."""
