"""What a study asks for, decided without torch: study and suite files, race decisions and
spending, cost estimates, shared runs, resources."""
