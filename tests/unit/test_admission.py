import pytest

from services.common.errors import OverloadedError
from services.language.admission import Admission
from services.language.engine import EngineStats


def test_beyond_what_the_engine_runs_or_can_start_at_most_queue_wait():
    state = {"stats": EngineStats(running=0, waiting=0, room=1)}
    admission = Admission(queue=2, occupancy=lambda: state["stats"],
                          describe=lambda: "; 1 running")
    tickets = [admission.reserve() for _ in range(3)]  # room for one, two more may wait
    with pytest.raises(OverloadedError, match=r"3 requests wait .*max_queue=2\); 1 running"):
        admission.reserve()
    state["stats"] = EngineStats(running=1, waiting=2, room=0)
    assert admission.waiting == 2
    with pytest.raises(OverloadedError):
        admission.reserve()
    tickets[0].release()  # one finished: a place in the queue is free again
    state["stats"] = EngineStats(running=1, waiting=1, room=0)
    admission.reserve()


def test_release_is_idempotent_and_gives_the_place_back():
    admission = Admission(queue=0, occupancy=lambda: EngineStats(0, 0, room=1))
    ticket = admission.reserve()
    ticket.release()
    ticket.release()
    assert admission.reserved == 0
    admission.reserve()
    with pytest.raises(OverloadedError, match="max_queue=0"):
        admission.reserve()


def test_one_error_map_gives_every_status_both_services_use():
    import grpc

    from hero_core.errors import InvalidInputError
    from services.common.errors import (
        DeadlineError,
        NotFoundError,
        OverloadedError,
        UnauthenticatedError,
        UnavailableError,
        UpstreamError,
        status_for,
    )

    cases = {InvalidInputError("a"): grpc.StatusCode.INVALID_ARGUMENT,
             NotFoundError("b"): grpc.StatusCode.NOT_FOUND,
             OverloadedError("c"): grpc.StatusCode.RESOURCE_EXHAUSTED,
             UnauthenticatedError("d"): grpc.StatusCode.UNAUTHENTICATED,
             UnavailableError("e"): grpc.StatusCode.UNAVAILABLE,
             DeadlineError("f"): grpc.StatusCode.DEADLINE_EXCEEDED,
             UpstreamError(grpc.StatusCode.FAILED_PRECONDITION, "g"):
                 grpc.StatusCode.FAILED_PRECONDITION}
    for exc, code in cases.items():
        assert status_for(exc, "r1") == (code, str(exc))
    code, message = status_for(KeyError("secret internals"), "r2")
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message and "r2" in message
