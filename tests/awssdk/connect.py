"""Connects to a lobby with the AWS IoT Device SDK v2 for Python, as stock firmware would.

usage: connect.py HOST PORT CERT KEY CA CLIENT_ID {3,5}

The builders are called with their defaults: on port 443 they offer ALPN `x-amzn-mqtt-ca`.
Prints one JSON line: {"connected": true, ...} or {"connected": false, "error": ...}.
"""

import json
import sys
import threading

from awsiot import mqtt5_client_builder, mqtt_connection_builder


def v3(host, port, cert, key, ca, client_id):
    conn = mqtt_connection_builder.mtls_from_path(
        endpoint=host,
        port=port,
        cert_filepath=cert,
        pri_key_filepath=key,
        ca_filepath=ca,
        client_id=client_id,
        clean_session=True,
        keep_alive_secs=30,
    )
    try:
        result = conn.connect().result(15)
    except Exception as e:  # the SDK raises its own error types
        return {"connected": False, "error": repr(e)}
    conn.disconnect().result(15)
    return {"connected": True, "session_present": result["session_present"]}


def v5(host, port, cert, key, ca, client_id):
    done = threading.Event()
    out = {}

    def success(data):
        out.update(connected=True, reason=int(data.connack_packet.reason_code))
        done.set()

    def failure(data):
        out.update(connected=False, error=repr(data.exception))
        done.set()

    client = mqtt5_client_builder.mtls_from_path(
        endpoint=host,
        port=port,
        cert_filepath=cert,
        pri_key_filepath=key,
        ca_filepath=ca,
        client_id=client_id,
        on_lifecycle_connection_success=success,
        on_lifecycle_connection_failure=failure,
    )
    client.start()
    if not done.wait(15):
        out.update(connected=False, error="no connection result within 15 s")
    client.stop()
    return out


def main():
    host, port, cert, key, ca, client_id, version = sys.argv[1:8]
    run = v3 if version == "3" else v5
    print(json.dumps(run(host, int(port), cert, key, ca, client_id)), flush=True)


if __name__ == "__main__":
    main()
