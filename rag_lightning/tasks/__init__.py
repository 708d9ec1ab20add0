"""Tasks: what an example holds and how it is predicted and scored (KILT format and scores: kilt.py)."""
