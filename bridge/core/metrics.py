"""Prometheus metrics of one cell, in their own registry."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MOS_BUCKETS = (1.0, 2.0, 2.5, 3.0, 3.5, 3.8, 4.0, 4.1, 4.2, 4.3, 4.4, 4.5)
FRAME_BUCKETS = (0.005, 0.010, 0.015, 0.019, 0.021, 0.025, 0.030, 0.040, 0.060, 0.100, 0.250)
JITTER_BUCKETS = (0.001, 0.002, 0.005, 0.010, 0.020, 0.030, 0.050, 0.100, 0.200)
LOSS_BUCKETS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0)
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.calls_active = Gauge("trunkline_calls_active", "Calls admitted and not yet ended", registry=r)
        self.capacity = Gauge("trunkline_cell_capacity", "Calls this cell accepts at once", registry=r)
        self.draining = Gauge("trunkline_cell_draining", "1 while the cell refuses new calls to drain", registry=r)
        self.calls_total = Counter("trunkline_calls_total", "Calls by direction and result",
                                   ["direction", "result"], registry=r)
        self.sip_rejected = Counter("trunkline_sip_rejected_total", "INVITEs refused before a call",
                                    ["reason"], registry=r)
        self.mos = Histogram("trunkline_call_mos", "E-model MOS per call, observed at hangup",
                             buckets=MOS_BUCKETS, registry=r)
        self.jitter = Histogram("trunkline_rtp_jitter_seconds", "Mean RTP interarrival jitter per call (received)",
                                buckets=JITTER_BUCKETS, registry=r)
        self.loss = Histogram("trunkline_rtp_loss_ratio", "RTP packet loss ratio per call (received)",
                              buckets=LOSS_BUCKETS, registry=r)
        self.late = Histogram("trunkline_rtp_late_ratio",
                              "Received RTP packets never played per call: too late for the jitter buffer",
                              buckets=LOSS_BUCKETS, registry=r)
        self.frame_interval = Histogram("trunkline_media_frame_interval_seconds",
                                        "Interval between 20 ms frames delivered by the media clock",
                                        buckets=FRAME_BUCKETS, registry=r)
        self.frame_gaps = Counter("trunkline_media_frame_gaps_total",
                                  "Frame intervals over 40 ms (the clock was stalled)", registry=r)
        self.frames_dropped = Counter("trunkline_media_frames_dropped_total",
                                      "Frames dropped by a full hand-off queue", ["direction"], registry=r)
        self.duration = Histogram("trunkline_call_duration_seconds", "Connected time per answered call",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.dtmf = Counter("trunkline_dtmf_total", "DTMF digits received", ["method"], registry=r)
        self.app_errors = Counter("trunkline_app_errors_total", "Calls ended by an application error",
                                  registry=r)
        self.turn_latency = Histogram("trunkline_turn_latency_seconds", "Voice agent latency per turn and stage",
                                      ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.bargein_latency = Histogram("trunkline_bargein_latency_seconds",
                                         "Caller speech onset to agent audio stopped", buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.interruptions = Counter("trunkline_agent_interruptions_total", "Barge-ins", registry=r)
        self.reprompts = Counter("trunkline_agent_reprompts_total", "Reprompts by kind", ["kind"], registry=r)
        self.model_errors = Counter("trunkline_model_errors_total", "Model/engine errors", ["engine"], registry=r)
        self.rtf = Histogram("trunkline_engine_rtf", "Engine real-time factor (processing / audio seconds)",
                             ["engine"], buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0), registry=r)
        self.llm_tokens_per_second = Histogram("trunkline_llm_tokens_per_second", "LLM generation speed per reply",
                                               buckets=(5, 10, 20, 40, 60, 80, 100, 150, 200, 300), registry=r)
        self.webhook_deliveries = Counter("trunkline_webhook_deliveries_total", "Webhook delivery attempts by result",
                                          ["result"], registry=r)
        self.record_errors = Counter("trunkline_record_write_errors_total",
                                     "Call records that could not be written", registry=r)
        self.record_queue = Gauge("trunkline_record_queue_depth",
                                  "Records waiting for the cell's durable writer (queued or held for retry)",
                                  registry=r)
        self.records_dropped = Counter("trunkline_records_dropped_total", "Records the durable writer gave up "
                                       "(queue full or rejected by the database), each logged in full", registry=r)
        self.recordings_active = Gauge("trunkline_recordings_active", "Call recordings being written", registry=r)
        self.recording_bytes = Counter("trunkline_recording_bytes_total",
                                       "Bytes of encrypted recordings written to disk", registry=r)
        self.recording_write_errors = Counter("trunkline_recording_write_errors_total",
                                              "Recordings stopped (or not started) by a failing write", registry=r)
        self.recording_encryption_failures = Counter(
            "trunkline_recording_encryption_failures_total",
            "Recording chunks that could not be sealed, or failed authentication when read back", registry=r)
        self.streams_active = Gauge("trunkline_streams_active", "Media streams started and not yet ended", registry=r)
        self.stream_frames_sent = Counter("trunkline_stream_frames_sent_total",
                                          "20 ms frames written to media stream consumers", ["encoding"], registry=r)
        self.stream_frames_received = Counter("trunkline_stream_frames_received_total",
                                              "20 ms frames of consumer audio queued for playback", ["encoding"],
                                              registry=r)
        self.stream_frames_dropped = Counter("trunkline_stream_frames_dropped_total",
                                             "Frames dropped because a stream's send buffer was full",
                                             ["encoding"], registry=r)
        self.stream_reconnects = Counter("trunkline_stream_reconnects_total",
                                         "Reconnect attempts of outbound media streams", registry=r)
        self.stream_client_errors = Counter("trunkline_stream_client_errors_total",
                                            "Messages from stream consumers answered with an error", registry=r)
        self.tool_calls = Counter("trunkline_tool_calls_total", "Tool calls by tool and outcome "
                                  "(ok, accepted, invalid, rejected, error, unavailable, quota)",
                                  ["tool", "outcome"], registry=r)
        self.tool_latency = Histogram("trunkline_tool_latency_seconds", "Tool call time, retries included",
                                      ["tool"], buckets=LATENCY_BUCKETS + (7.5, 10.0, 15.0, 30.0), registry=r)
        self.tool_errors = Counter("trunkline_tool_errors_total", "Failed tool calls by kind", ["tool", "kind"],
                                   registry=r)
        self.tool_retries = Counter("trunkline_tool_retries_total", "Tool request retries", ["tool"], registry=r)
        self.tool_breaker = Gauge("trunkline_tool_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                                  ["tool"], registry=r)
        self.outbound_refused = Counter("trunkline_outbound_refused_total",
                                        "Outbound connections refused by the SSRF guard (http.outbound_allow)",
                                        ["use"], registry=r)
        self.api_limited = Counter("trunkline_api_limited_total",
                                   "API requests or client messages refused or dropped by a limit",
                                   ["limit"], registry=r)
        self.tool_async = Counter("trunkline_tool_async_results_total", "Asynchronous tool results received",
                                  ["tool", "outcome"], registry=r)
