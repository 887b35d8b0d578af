"""Sparkplug B (Eclipse Sparkplug 3.0): the payload codec and topic namespace, shared by the MQTT
simulator (an edge node) and the MQTT collector (a host application). Pure: no I/O.

The protobuf code is generated from the specification's schema (`sparkplug_b.proto` beside it);
`payload.py` builds and reads messages through it, never by hand.
"""
