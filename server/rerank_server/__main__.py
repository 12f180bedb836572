import sys

from rerank_server.main import main

if __name__ == "__main__":
    sys.exit(main())
