"""``python -m ttds_ray`` works like the ``ttds-ray`` command."""
from .cli import main

if __name__ == "__main__":
    main()
