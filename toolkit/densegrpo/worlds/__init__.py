"""Self-contained worlds to run the method in: the toy text-to-image world and the credit-assignment lab,
each with its own policy and reward, and GenEval's rules. Imports the api and the components, never the run.
"""
