"""The ground floor: what every folder uses (the error family, the label table, atomic writes); imports nothing of ours."""
