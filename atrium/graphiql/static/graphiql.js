// Atrium's GraphiQL: every script and style comes from this server (no CDN, nothing inline).
//
// The endpoint is this page's own URL, over HTTP for queries and mutations and over
// graphql-transport-ws for subscriptions; the Headers pane is sent with both (GraphiQL puts the
// headers in connection_init, where Atrium reads `Authorization`). A link may carry a token in
// its fragment, `/graphql#token=eyJ...`, which browsers never send to a server: it becomes the
// Authorization header and is removed from the address bar.
"use strict";

(function () {
  const page = new URL(window.location.href);
  const token = new URLSearchParams(page.hash.slice(1)).get("token");
  page.hash = "";
  page.search = "";
  const endpoint = page.toString();
  if (token) {
    window.history.replaceState(null, "", endpoint);
  }

  const DEFAULT_QUERY = `# Atrium's GraphQL API. Paste your token in the Headers pane below:
#   {"Authorization": "Bearer eyJhbGciOi..."}
# (./dev serve prints one), then run this with Ctrl-Enter.

query Me {
  me { name email }
  tenant { slug name }
}
`;

  const fetcher = GraphiQL.createFetcher({
    url: endpoint,
    subscriptionUrl: endpoint.replace(/^http/, "ws"),
  });

  const props = {
    fetcher: fetcher,
    defaultQuery: DEFAULT_QUERY,
    defaultEditorToolsVisibility: token ? "headers" : true,
    isHeadersEditorEnabled: true,
    shouldPersistHeaders: false,
    inputValueDeprecation: true,
  };
  if (token) {
    props.headers = JSON.stringify({ Authorization: `Bearer ${token}` }, null, 2);
  }
  ReactDOM.createRoot(document.getElementById("graphiql")).render(React.createElement(GraphiQL, props));
})();
