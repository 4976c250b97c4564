# Builds Tandem's three images from one workspace build:
#   docker build --target proxy    -t tandem-proxy:0.1.0 .
#   docker build --target operator -t tandem-operator:0.1.0 .
#   docker build --target webhook  -t tandem-webhook:0.1.0 .
#   docker build --target testapp  -t tandem-testapp:dev .     (the e2e and demo sample app)
# Static musl binaries on a distroless base, run as non-root. `make images` builds all three.

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools cmake && rm -rf /var/lib/apt/lists/*
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
      -p tandem-proxy -p tandem-operator -p tandem-webhook -p tandem-tests \
 && mkdir /out && cp target/x86_64-unknown-linux-musl/release/tandem-{proxy,operator,webhook,testapp} /out/

# The proxy image also runs `tandem-proxy init`, which needs iptables: the init container uses
# the same image with NET_ADMIN/NET_RAW, so iptables and ip6tables come from Debian here.
FROM debian:bookworm-slim AS proxy
RUN apt-get update && apt-get install -y --no-install-recommends iptables && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/tandem-proxy /usr/local/bin/tandem-proxy
USER 2102:2102
ENTRYPOINT ["/usr/local/bin/tandem-proxy"]
CMD ["run"]

FROM gcr.io/distroless/static-debian12:nonroot AS operator
COPY --from=build /out/tandem-operator /tandem-operator
ENTRYPOINT ["/tandem-operator"]

FROM gcr.io/distroless/static-debian12:nonroot AS webhook
COPY --from=build /out/tandem-webhook /tandem-webhook
ENTRYPOINT ["/tandem-webhook"]

FROM gcr.io/distroless/static-debian12:nonroot AS testapp
COPY --from=build /out/tandem-testapp /tandem-testapp
ENTRYPOINT ["/tandem-testapp"]
