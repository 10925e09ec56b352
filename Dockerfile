# Conventional multi-stage build: a static-ish release binary on a distroless non-root base.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin mail-oauth-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/mail-oauth-operator /usr/local/bin/mail-oauth-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/mail-oauth-operator"]
CMD ["run"]
