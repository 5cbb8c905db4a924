"""The live SDK's names and defaults, defined once: buffer policies and sizes, decoder timeouts,
reconnect backoff, the statistics windows and the source states."""

from __future__ import annotations

# Buffer policies between a camera's reader thread and its scorer. "wait": the reader blocks when the
# buffer is full (no frame lost; a file's default). "drop-oldest": the oldest buffered frame is dropped
# and counted (latency bounded; a live stream's default, since a camera cannot be paused).
WAIT = "wait"
DROP_OLDEST = "drop-oldest"
POLICIES = (WAIT, DROP_OLDEST)

# A live camera keeps at most this many decoded frames waiting: with 1-2 the result describes what
# the camera saw a frame or two ago, not a backlog of seconds.
LIVE_BUFFER = 2
# A file waits for the scorer anyway; a few frames let decoding overlap scoring.
FILE_BUFFER = 8
MAX_BUFFER = 1024  # a bigger buffer of 720p frames is gigabytes: refused in the config

# Frames of one source scored at once (requests in flight); order is kept per source whatever it is.
DEFAULT_DEPTH = 2

# Seconds a network source may take to open, and may stay silent before it counts as stopped
# (a camera that resets without EOS never closes the socket: only silence says it is gone).
OPEN_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 5.0

# Reconnect backoff: first wait, doubling up to the cap; reset by the first frame after a reconnect.
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0

# Rates are measured over the last RATE_WINDOW_S seconds; latency percentiles over the last
# LATENCY_SAMPLES results (a live line runs for days: statistics must not grow).
RATE_WINDOW_S = 5.0
LATENCY_SAMPLES = 2000
GAPS_KEPT = 100  # the most recent reconnect gaps kept for status(); the count is total

# A wait-policy camera (no frame lost) re-sends a frame while the server is unavailable (restarting),
# up to this long, with the reconnect backoff; a drop-oldest camera reports the frame as an error at
# once (by the time the server is back, newer frames are worth more).
SERVER_WAIT_S = 60.0

# Source states, as status() and the Prometheus gauge report them.
CONNECTING = "connecting"
CONNECTED = "connected"
RECONNECTING = "reconnecting"
ENDED = "ended"  # a file or folder read to its end, a source removed, or a stream stopped by the user
FAILED = "failed"  # could not be read (bad path, not a video, reconnect limit reached): `error` says why
STATES = (CONNECTING, CONNECTED, RECONNECTING, ENDED, FAILED)

# The scorer waits this long for a frame before it looks at the results in flight again.
POLL_S = 0.05
