import sys

from rerank_client.cli import main

sys.exit(main())
