"""What a run is: its config and identity, run-directory files, outcome, the code snapshot, dataset
file checks. No torch."""
