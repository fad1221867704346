"""The Celery app's unacked-restore settings on a real Redis: a worker killed inside kombu's restore sweep leaves
the sweep's mutex behind, and every restore (the redelivery of the killed worker's step included) waits until it
expires. kombu's default keeps it 300 s; cfrseg's app keeps it 10 s (services/orchestrator/app.py)."""

from __future__ import annotations

from services.orchestrator.app import UNACKED_MUTEX_EXPIRE_S, make_app
from tests.servers import redis_server  # noqa: F401


def test_a_mutex_left_by_a_killed_sweep_expires_within_seconds(redis_server):  # noqa: F811
    app = make_app(broker=redis_server.url, backend=redis_server.url)
    with app.connection() as conn:
        qos = conn.default_channel.qos
        assert qos.visibility_timeout == 15 and qos.unacked_mutex_expire == UNACKED_MUTEX_EXPIRE_S <= 10
        r = redis_server.client()
        r.delete(qos.unacked_mutex_key)
        # a sweep that never finishes (its worker was killed): enter the mutex and do not leave it
        from kombu.transport.redis import Mutex

        held = Mutex(r, qos.unacked_mutex_key, qos.unacked_mutex_expire)
        held.__enter__()
        ttl = r.ttl(qos.unacked_mutex_key)
        assert 0 < ttl <= UNACKED_MUTEX_EXPIRE_S, ttl       # kombu's default would show 300 here
        # meanwhile a new worker's sweep is skipped (kombu swallows MutexHeld) rather than failing
        qos.restore_visible(num=10, interval=1)
        assert r.exists(qos.unacked_mutex_key)
