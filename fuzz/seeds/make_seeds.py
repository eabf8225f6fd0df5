#!/usr/bin/env python3
"""Writes the hand-made seed inputs into corpus/<target>/seed-*.

frame_decode inputs: the first byte chooses the mode (0: the whole stream, 1: after a valid
3.1.1 CONNECT, 2: after a valid 5 CONNECT), see fuzz_targets/frame_decode.rs."""
import json, os

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "corpus")

def varint(n):
    out = bytearray()
    while True:
        b = n % 128; n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)

def s(text):
    b = text if isinstance(text, bytes) else text.encode()
    return len(b).to_bytes(2, "big") + b

def frame(first, body):
    return bytes([first]) + varint(len(body)) + body

def props(raw=b""):
    return varint(len(raw)) + raw

def connect(level, client=b"station-S1", will=None, user=None, password=None,
            conn_props=b"", will_props=b"", keep_alive=60):
    flags = 0x02
    payload = s(client)
    if will:
        topic, msg, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        if level == 5:
            payload += props(will_props)
        payload += s(topic) + s(msg)
    if user is not None:
        flags |= 0x80; payload += s(user)
    if password is not None:
        flags |= 0x40; payload += s(password)
    var = s("MQTT") + bytes([level, flags]) + keep_alive.to_bytes(2, "big")
    if level == 5:
        var += props(conn_props)
    return frame(0x10, var + payload)

def publish(level, topic, payload, qos=0, pkid=1, retain=False, dup=False, p=b""):
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    body = s(topic)
    if qos:
        body += pkid.to_bytes(2, "big")
    if level == 5:
        body += props(p)
    return frame(first, body + payload)

def subscribe(level, filters, pkid=2, p=b""):
    body = pkid.to_bytes(2, "big") + (props(p) if level == 5 else b"")
    for f, opts in filters:
        body += s(f) + bytes([opts])
    return frame(0x82, body)

def unsubscribe(level, filters, pkid=3):
    body = pkid.to_bytes(2, "big") + (props() if level == 5 else b"")
    for f in filters:
        body += s(f)
    return frame(0xA2, body)

def ack(kind, pkid, level, reason=None):
    body = pkid.to_bytes(2, "big")
    if level == 5 and reason is not None:
        body += bytes([reason]) + props()
    return frame(kind, body)

PINGREQ = bytes([0xC0, 0])
DISCONNECT = bytes([0xE0, 0])

# MQTT 5 properties: payload format (0x01), message expiry (0x02), content type (0x03),
# response topic (0x08), correlation data (0x09), subscription id (0x0B), session expiry
# (0x11), receive maximum (0x21), topic alias (0x23), user property (0x26), will delay (0x18).
PUB_PROPS = (b"\x01\x01" + b"\x02\x00\x00\x00\x3c" + b"\x03" + s("application/json")
             + b"\x08" + s("stations/S1/reply") + b"\x09" + s(b"\x00\x01corr")
             + b"\x23\x00\x01" + b"\x26" + s("k") + s("v"))
CONN_PROPS = b"\x11\x00\x00\x0e\x10" + b"\x21\x00\x10" + b"\x26" + s("site") + s("hall-2")
WILL_PROPS = b"\x18\x00\x00\x00\x05" + b"\x01\x01"

def session(level):
    c = connect(level, will=("stations/S1/status", b'{"online":false}', 1, True),
                user="station-S1", password="secret",
                conn_props=CONN_PROPS, will_props=WILL_PROPS)
    return c

seeds = {}
for level, mode in ((4, 1), (5, 2)):
    v = f"v{level}"
    full = session(level)
    seeds[f"{v}-connect-will-login"] = b"\x00" + full
    seeds[f"{v}-connect-minimal"] = b"\x00" + connect(level, client=b"")
    seeds[f"{v}-connect-password-only"] = b"\x00" + connect(level, password="x")
    seeds[f"{v}-session"] = b"\x00" + full + b"".join([
        publish(level, "stations/S1/auth/request", b'{"serial":"S1"}', qos=1, pkid=1),
        subscribe(level, [("stations/S1/cmd", 1), ("stations/+/data/#", 2), ("#", 0)]),
        unsubscribe(level, ["stations/+/data/#", "#"]),
        ack(0x40, 9, level, 0), PINGREQ, DISCONNECT])
    seeds[f"{v}-publish-qos0"] = bytes([mode]) + publish(level, "stations/S1/status", b'{"online":true}')
    seeds[f"{v}-publish-qos1"] = bytes([mode]) + publish(level, "a/b", b"x", qos=1, pkid=0x1234)
    seeds[f"{v}-publish-qos2-flow"] = bytes([mode]) + publish(level, "a/b", b"x", qos=2, pkid=7, dup=True) \
        + ack(0x50, 7, level, 0) + ack(0x62, 7, level, 0) + ack(0x70, 7, level, 0)
    seeds[f"{v}-publish-retain-empty"] = bytes([mode]) + publish(level, "stations/S1/status", b"", retain=True)
    seeds[f"{v}-publish-qos3"] = bytes([mode]) + bytes([0x36]) + publish(level, "a", b"x", qos=1)[1:]
    seeds[f"{v}-publish-pkid-zero"] = bytes([mode]) + publish(level, "a", b"x", qos=1, pkid=0)
    seeds[f"{v}-publish-topic-not-utf8"] = bytes([mode]) + publish(level, b"\xff\xfe/\xc0", b"x")
    seeds[f"{v}-publish-topic-wildcard"] = bytes([mode]) + publish(level, "a/+/#", b"x", qos=1)
    seeds[f"{v}-subscribe-wildcards"] = bytes([mode]) + subscribe(level, [("+/+/#", 0), ("$SYS/#", 1), ("a/#", 2)])
    seeds[f"{v}-subscribe-bad-qos"] = bytes([mode]) + subscribe(level, [("a", 3)])
    seeds[f"{v}-subscribe-filter-not-utf8"] = bytes([mode]) + subscribe(level, [(b"\xff", 0)])
    seeds[f"{v}-subscribe-empty"] = bytes([mode]) + frame(0x82, b"\x00\x01" + (b"\x00" if level == 5 else b""))
    seeds[f"{v}-unsubscribe"] = bytes([mode]) + unsubscribe(level, ["a/+", "#"])
    seeds[f"{v}-truncated-publish"] = bytes([mode]) + publish(level, "a/b", b"payload", qos=1)[:-3]
    seeds[f"{v}-truncated-length"] = bytes([mode]) + b"\x30\xff\xff"
    seeds[f"{v}-huge-remaining-length"] = bytes([mode]) + b"\x30\xff\xff\xff\x7f" + b"a" * 16
    seeds[f"{v}-malformed-remaining-length"] = bytes([mode]) + b"\x30\xff\xff\xff\xff\x01"
    seeds[f"{v}-reserved-packet-type"] = bytes([mode]) + b"\xf0\x00" + b"\x00\x02\x00\x00"
    seeds[f"{v}-second-connect"] = bytes([mode]) + connect(level)
seeds["v5-publish-properties"] = b"\x02" + publish(5, "a/b", b"{}", qos=1, p=PUB_PROPS)
seeds["v5-publish-topic-alias-empty-topic"] = b"\x02" + publish(5, "", b"x", p=b"\x23\x00\x01")
seeds["v5-subscribe-properties"] = b"\x02" + subscribe(5, [("a/#", 0x2e)], p=b"\x0b\x05" + b"\x26" + s("k") + s("v"))
seeds["v5-bad-property-id"] = b"\x02" + publish(5, "a", b"x", p=b"\x7f\x00")
seeds["v5-property-length-overrun"] = b"\x02" + frame(0x30, s("a") + b"\x7f\x01")
seeds["v5-disconnect-with-reason"] = b"\x02" + frame(0xE0, b"\x04" + props(b"\x1f" + s("bye")))
seeds["v5-auth-packet"] = b"\x02" + frame(0xF0, b"\x00" + props())
seeds["v3-connect"] = b"\x00" + frame(0x10, s("MQIsdp") + bytes([3, 2, 0, 60]) + s("c"))
seeds["connect-level-6"] = b"\x00" + frame(0x10, s("MQTT") + bytes([6, 2, 0, 60]) + s("c"))
seeds["connect-huge-remaining-length"] = b"\x00\x10\xff\xff\xff\x7f" + s("MQTT") + b"\x04\x02\x00\x3c"
seeds["not-connect"] = b"\x00" + PINGREQ
seeds["truncated-connect"] = b"\x00" + session(4)[:20]

# Operator requests: one envelope with every command of PROTOCOL §6, and a few odd ones.
FP = "AB:" * 31 + "AB"
all_commands = [
    {"command": "listStations", "state": "pending", "correlationData": 1},
    {"command": "getStation", "serial": "S1", "correlationData": "two"},
    {"command": "acceptStation", "serial": "S1", "fingerprint": FP},
    {"command": "acceptStation", "serial": "S1", "fingerprint": "ab" * 32},
    {"command": "rejectStation", "serial": "S1"},
    {"command": "listRejectedStations"},
    {"command": "clearRejectedStation", "serial": "S1"},
    {"command": "startStationUpdate", "serial": "S1", "version": "1.2.3"},
    {"command": "startStationUpdate", "serial": "S1"},
    {"command": "resetStation", "serial": "S1", "delete_authentication": True, "delete_configuration": False},
    {"command": "removeStation", "serial": "S1"},
    {"command": "createPhone", "mac": "00:11:22:33:44:55", "vendor": "Acme", "type": "T1", "site": "Hall 2"},
    {"command": "listPhones"},
    {"command": "getPhone", "mac": "00-11-22-33-44-55"},
    {"command": "suspendPhoneAuthentication", "mac": "001122334455"},
    {"command": "resetPhoneAuthentication", "mac": "00:11:22:33:44:55"},
    {"command": "deletePhone", "mac": "00:11:22:33:44:55"},
    {"command": "addWhitelistEntry", "entry": "203.0.113.7"},
    {"command": "removeWhitelistEntry", "entry": "203.0.113.0/24"},
    {"command": "listWhitelist"},
    {"command": "exportDevicesCsv"},
    {"command": "importPhonesCsv", "csv": "vendor,type,mac,created_at,site,auth_state,pap\nAcme,T1,00:11:22:33:44:66,,Hall 2,,\n"},
    {"command": "listAuditLog", "limit": 10},
    {"command": "listAuditLog"},
]
requests = {
    "all-commands": {"commands": all_commands},
    "odd-arguments": {"commands": [
        {"command": 5, "correlationData": {"nested": [1, 2, None]}},
        {"correlationData": None},
        {"command": "getStation", "serial": 7},
        {"command": "getStation", "serial": "x" * 65},
        {"command": "acceptStation", "serial": "S1", "fingerprint": "zz"},
        {"command": "resetStation", "serial": "S1", "delete_authentication": "yes"},
        {"command": "createPhone", "mac": "00:11:22:33:44", "vendor": "a\u0007b", "type": "t" * 300},
        {"command": "listAuditLog", "limit": 0},
        {"command": "listAuditLog", "limit": 1e300},
        {"command": "listAuditLog", "limit": -1},
        {"command": "unknownCommand"},
        "not an object",
        None,
    ]},
    "empty-commands": {"commands": []},
    "commands-not-array": {"commands": {"command": "listStations"}},
    "no-commands": {"command": "listStations"},
}
raw_requests = {
    "not-json": b"{\"commands\": [",
    "not-utf8": b"{\"commands\": [{\"command\": \"\xff\"}]}",
    "top-level-array": b"[{\"command\": \"listStations\"}]",
    "deep-nesting": b"{\"commands\": [" + b"[" * 200 + b"]" * 200 + b"]}",
    "escapes": b"{\"commands\": [{\"command\": \"get\\u0053tation\", \"serial\": \"S\\ud83d\\ude00\"}]}",
    "lone-surrogate": b"{\"commands\": [{\"command\": \"\\ud800\"}]}",
}

def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)

for name, data in seeds.items():
    write("frame_decode", name, data)
for name, value in requests.items():
    write("operator_request", name, json.dumps(value).encode())
for name, data in raw_requests.items():
    write("operator_request", name, data)
print(len(seeds), "frame seeds,", len(requests) + len(raw_requests), "request seeds")
