"""``hizli bench longest``: search (search.py), one trial (trials.py), one worker process (worker.py), the run (run.py)."""
