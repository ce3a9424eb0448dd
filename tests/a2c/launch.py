"""Serves acme2certifier's WSGI application over TLS, for the tests only.

acme2certifier ships a WSGI application but no server; this is the smallest
one that works: the standard library's WSGI server in front of it, its socket
wrapped in TLS (ACME clients require https), the scheme reported as https so
the URLs in the directory and orders are https too. Single-threaded, as the
tests use it one request at a time.

Usage: launch.py <host> <port> <cert.pem> <key.pem>  (ACME_SRV_CONFIGFILE set)
"""
import ssl
import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server

from acme2certifier.share.acme2certifier_wsgi import application


def https(environ, start_response):
    environ["wsgi.url_scheme"] = "https"
    return application(environ, start_response)


class Handler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        sys.stderr.write("a2c %s\n" % (format % args))


def main():
    host, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    server = make_server(host, port, https, handler_class=Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    sys.stderr.write("a2c ready\n")
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
