"""Tables, verdicts, plots and pages of studies and suites (pandas, seaborn). No torch."""
