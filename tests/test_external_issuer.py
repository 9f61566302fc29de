"""Herald trusting another issuer through OIDC discovery: here another Herald's embedded issuer,
served over real HTTP, stands in for an IdP such as Entra ID or Keycloak."""

from __future__ import annotations

from pathlib import Path

from herald.auth.issuer import LocalIssuer
from tests.conftest import Server, make_settings, serve_in_thread


def test_tokens_from_a_configured_issuer_are_accepted(server: Server, tmp_path: Path) -> None:
    idp = LocalIssuer.load_or_create(server.data, server.settings.issuer_url, "api://herald")
    trusted = {
        "issuer": idp.issuer,
        "audience": "api://herald",
        "discovery_url": f"{server.base_url}/.well-known/openid-configuration",
    }
    settings = make_settings(tmp_path, local_issuer=False, issuers=(trusted,))
    for url in serve_in_thread(settings):
        other = Server(settings, url)
        app = other.register()
        token = idp.mint(client_id=app.client_id, user_id="ida")
        body = {"targetHostName": app.host_name, "payload": {"rawContent": "hi"}}
        with other.client(token) as c:
            assert c.post("/beta/me/notifications", json=body).status_code == 201
            assert c.get("/beta/me/notifications/$count").text == "1"
        # This Herald has no issuer of its own: its own token endpoint is off.
        with other.client() as c:
            form = {"grant_type": "client_credentials", "client_id": app.client_id}
            assert c.post("/oauth2/v2.0/token", data=form).status_code == 404
        other.close_clients()
