#!/usr/bin/env python3
"""A local RTSP server to try `promptmad watch` and to test it: Debian's gst-rtsp-server through
python3-gi (run it with the system python: /usr/bin/python3). Each mount re-streams what a publisher
sends as MPEG-TS (H.264) to a local UDP port, so ffmpeg plays the camera and can be stopped and
restarted like a camera that resets; --test-pattern serves a generated pattern with no publisher.

    /usr/bin/python3 scripts/rtsp_server.py --port 8554 --udp-port 5004 &       # rtsp://127.0.0.1:8554/cam
    ffmpeg -re -f lavfi -i testsrc=size=640x480:rate=25 -c:v libx264 -tune zerolatency -g 25 \
           -f mpegts udp://127.0.0.1:5004?pkt_size=1316

Needs: apt-get install gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
python3-gi (and gstreamer1.0-plugins-ugly for --test-pattern's x264enc). Prints "ready" once listening.
"""

import argparse
import signal
import sys

# MPEG-TS from the publisher -> H.264 -> RTP; config-interval=-1 repeats SPS/PPS with every key frame
# so a client that (re)connects mid-stream can start decoding at the next key frame.
RELAY = ('( udpsrc address=127.0.0.1 port={udp_port} caps="video/mpegts,systemstream=(boolean)true" '
         '! rtpmp2tpay name=pay0 pt=33 )')
PATTERN = ('( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},framerate={fps}/1 '
           '! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} ! rtph264pay name=pay0 pt=96 config-interval=-1 )')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8554)
    ap.add_argument("--mount", default="/cam")
    ap.add_argument("--udp-port", type=int, default=5004, help="where the publisher sends MPEG-TS")
    ap.add_argument("--test-pattern", action="store_true", help="serve a generated pattern (no publisher)")
    ap.add_argument("--per-client", action="store_true",
                    help="a pipeline per client (--test-pattern only): a client that stops reading cannot hold back the others")
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--fps", type=int, default=25)
    args = ap.parse_args()

    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    width, height = args.size.split("x")
    launch = (PATTERN.format(width=width, height=height, fps=args.fps) if args.test_pattern
              else RELAY.format(udp_port=args.udp_port))
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch)
    factory.set_shared(not args.per_client)
    server.get_mount_points().add_factory(args.mount, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()
    signal.signal(signal.SIGTERM, lambda *_: loop.quit())
    print(f"ready rtsp://127.0.0.1:{args.port}{args.mount}", flush=True)
    try:
        loop.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
