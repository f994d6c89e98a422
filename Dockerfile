# syntax=docker/dockerfile:1
# Build: a Rust toolchain image; the dependency layer is cached apart from the sources.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > benches/pipeline.rs && echo 'fn main() {}' > benches/controller.rs \
 && cargo build --release --locked --bin braze-export-operator \
 && rm -rf src benches
COPY src src
COPY examples examples
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin braze-export-operator

# Run: distroless with CA certificates and glibc, no shell, non-root (uid 65532).
# The time zone database is compiled into the binary.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/braze-export-operator /usr/local/bin/braze-export-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/braze-export-operator"]
CMD ["controller"]
