"""Create the bucket if needed (compose's ``minio-init`` job): ``python -m services.common.init_bucket``."""

from __future__ import annotations

import sys
import time

from services.common.s3store import S3Store
from services.common.settings import Settings


def main() -> int:
    settings = Settings.from_env()
    store = S3Store.from_settings(settings)
    for attempt in range(30):
        try:
            store.ensure_bucket()
            print(f"bucket {settings.s3_bucket!r} ready at {settings.s3_endpoint}")
            return 0
        except Exception as e:  # noqa: BLE001  (the S3 server may still be starting)
            print(f"waiting for {settings.s3_endpoint}: {e}", file=sys.stderr)
            time.sleep(2)
    return 1


if __name__ == "__main__":
    sys.exit(main())
