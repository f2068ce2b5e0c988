"""Local process supervision for `maas up`: redis-server and the four services on one machine."""
