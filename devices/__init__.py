"""Home-device readings over MQTT: device registry, reading conversion, the stream consumer, alerts."""
