# The operator image: the `stratum` binary on a distroless base. The same
# binary is copied into every database pod by an init container
# (`stratum install-binary`), where it runs as the instance manager (PID 1)
# in the stock database image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin stratum

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/stratum /usr/local/bin/stratum
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/stratum"]
CMD ["controller"]
