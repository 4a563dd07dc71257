"""``python -m orchestrator.bench`` (``make bench``)."""
import sys

from orchestrator.bench import main

sys.exit(main())
