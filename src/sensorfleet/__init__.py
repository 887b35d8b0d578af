"""SensorFleet: simulate, collect and forecast industrial IoT sensor data (MQTT, CoAP, OPC UA)."""

__version__ = "0.1.0"
