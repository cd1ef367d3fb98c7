"""``python -m services.gateway``: the public HTTPS API (mutual TLS)."""

import sys

from services.common.errors import CommonError
from services.common.logs import configure_json_logging
from services.common.settings import load_settings
from services.gateway.server import create_server
from services.gateway.settings import GatewaySettings


def main() -> int:
    configure_json_logging("gateway")
    try:
        server, runtime = create_server(load_settings(GatewaySettings))
    except CommonError as error:
        print(f"gateway: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # every package's error root, reported in one line
        print(f"gateway: cannot start: {error}", file=sys.stderr)
        return 1
    try:
        server.run()
    finally:
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
