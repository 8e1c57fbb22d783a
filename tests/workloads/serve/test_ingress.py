"""The ingress's telemetry: a span per ranking request, latency per stage, requests by status."""

from __future__ import annotations

from opentelemetry import trace

from tests.conftest import Telemetry
from workloads.serve.errors import ServeError, client_error
from workloads.serve.ingress import observe_answer, observe_error
from workloads.serve.schemas import RankResponse, Timings

tracer = trace.get_tracer(__name__)


def _answer(version: str) -> RankResponse:
    return RankResponse(
        request_id="r1",
        member_id=7,
        surface="feed",
        model="ligr",
        model_version=version,
        cold_start=False,
        member_known=True,
        history_len=12,
        setwise_applied=True,
        items=[],
        timings=Timings(features_ms=3.0, pointwise_ms=5.0, setwise_ms=1.5, total_ms=10.0),
    )


def test_a_served_ranking_records_its_span_and_the_latency_of_each_stage(telemetry: Telemetry) -> None:
    with tracer.start_as_current_span("rank") as span:
        observe_answer(span, _answer("telemetry-test-v1"))
    attributes = [s.attributes for s in telemetry.spans("rank")]
    assert {"rankray.model_version": "telemetry-test-v1", "http.response.status_code": 200}.items() <= dict(
        attributes[-1]
    ).items()
    stages = {p.attributes["stage"]: p for p in telemetry.points("rankray.rank.duration")}
    assert set(stages) == {"features", "pointwise", "setwise", "total"}
    assert stages["total"].max >= 10.0 and stages["setwise"].min <= 1.5


def test_client_mistakes_leave_the_span_unset_and_outages_mark_it_an_error(telemetry: Telemetry) -> None:
    with tracer.start_as_current_span("rank") as client_span:
        observe_error(client_span, client_error("invalid_request", "candidates", "too many"), "ligr")
    with tracer.start_as_current_span("rank") as outage_span:
        observe_error(outage_span, ServeError(503, "unavailable", "feature store timed out"), "ligr")
    client, outage = telemetry.spans("rank")[-2:]
    assert client.status.is_unset and client.attributes["http.response.status_code"] == 422
    assert outage.status.status_code == trace.StatusCode.ERROR
    assert outage.status.description == "feature store timed out"
    by_status = {p.attributes["status"]: p.value for p in telemetry.points("rankray.rank.requests")}
    assert by_status[422] >= 1 and by_status[503] >= 1
