//! The gRPC test service (`proto/lab.proto`), served on every HTTP port
//! next to the JSON app (requests with `content-type: application/grpc`
//! go to it), and `lab-app grpc URL`, its client: one call of each shape,
//! with the statuses, messages and metadata that came back printed as
//! JSON.

use std::{pin::Pin, time::Duration};

use anyhow::Context;
use clap::{Args, ValueEnum};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use tonic::{
    Code, Request, Response, Status, Streaming,
    metadata::{MetadataMap, MetadataValue},
    transport::Endpoint,
};

use crate::resolve::ResolveArgs;

/// Generated from `proto/lab.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("lab.v1");
}

use pb::{
    Note, Summary,
    lab_client::LabClient,
    lab_server::{Lab, LabServer},
};

/// The trailer a failed unary call carries: the answering pod.
pub const DETAIL_TRAILER: &str = "x-lab-detail";
/// The trailer a failed `Count` stream carries: how many notes it sent.
pub const SENT_TRAILER: &str = "x-lab-sent";
/// The most notes one `Count` call sends.
pub const MAX_COUNT: u32 = 100_000;

/// The service, answering as `pod`.
#[derive(Debug, Clone)]
pub struct LabService {
    pod: String,
}

/// The service as a tower service for the HTTP server.
pub fn server(pod: &str) -> LabServer<LabService> {
    LabServer::new(LabService {
        pod: pod.to_owned(),
    })
}

/// A failed status with one metadata entry (sent in the trailers).
fn status_with(code: i32, message: String, key: &'static str, value: &str) -> Status {
    let mut metadata = MetadataMap::new();
    if let Ok(value) = MetadataValue::try_from(value) {
        metadata.insert(key, value);
    }
    Status::with_metadata(Code::from(code), message, metadata)
}

type NoteStream = Pin<Box<dyn Stream<Item = Result<Note, Status>> + Send>>;

#[tonic::async_trait]
impl Lab for LabService {
    async fn unary(&self, request: Request<Note>) -> Result<Response<Note>, Status> {
        let note = request.into_inner();
        if note.code != 0 {
            return Err(status_with(note.code, note.text, DETAIL_TRAILER, &self.pod));
        }
        Ok(Response::new(Note {
            text: note.text,
            pod: self.pod.clone(),
            ..Default::default()
        }))
    }

    type CountStream = NoteStream;

    async fn count(&self, request: Request<Note>) -> Result<Response<NoteStream>, Status> {
        let note = request.into_inner();
        let count = note.count.min(MAX_COUNT);
        let pod = self.pod.clone();
        let notes = futures::stream::iter(0..count).map(move |i| {
            Ok(Note {
                text: i.to_string(),
                count: i,
                pod: pod.clone(),
                ..Default::default()
            })
        });
        let end = (note.code != 0).then(|| {
            Err(status_with(
                note.code,
                note.text,
                SENT_TRAILER,
                &count.to_string(),
            ))
        });
        Ok(Response::new(Box::pin(
            notes.chain(futures::stream::iter(end)),
        )))
    }

    async fn collect(
        &self,
        request: Request<Streaming<Note>>,
    ) -> Result<Response<Summary>, Status> {
        let mut notes = request.into_inner();
        let mut summary = Summary {
            pod: self.pod.clone(),
            ..Default::default()
        };
        let mut texts = Vec::new();
        while let Some(note) = notes.message().await? {
            summary.count += 1;
            texts.push(note.text);
        }
        summary.joined = texts.join(",");
        Ok(Response::new(summary))
    }

    type ChatStream = NoteStream;

    async fn chat(
        &self,
        request: Request<Streaming<Note>>,
    ) -> Result<Response<NoteStream>, Status> {
        let pod = self.pod.clone();
        let replies = request.into_inner().map(move |note| {
            note.map(|note| Note {
                text: format!("re: {}", note.text),
                count: note.count,
                pod: pod.clone(),
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

/// Which call `lab-app grpc` makes.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Call {
    /// `Unary`: one note, one answer (or a status).
    Unary,
    /// `Count`: the server streams `--count` notes.
    Count,
    /// `Collect`: the client streams `--count` notes.
    Collect,
    /// `Chat`: `--count` notes, each answered before the next is sent.
    Chat,
}

/// Arguments of `lab-app grpc`.
#[derive(Args, Debug)]
pub struct GrpcArgs {
    /// The server: `http://host:port`.
    pub url: String,
    /// The call.
    #[arg(long, value_enum)]
    pub call: Call,
    /// The note's text (a failed call's message).
    #[arg(long, default_value = "hello")]
    pub text: String,
    /// The status the server should end the call with (`Unary`, `Count`).
    #[arg(long, default_value_t = 0)]
    pub code: i32,
    /// Notes to stream.
    #[arg(long, default_value_t = 3)]
    pub count: u32,
    /// Request metadata of a `Unary` call, `name=value` (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Time limit of the call.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub timeout_ms: u64,
    /// How names are resolved.
    #[command(flatten)]
    pub resolve: ResolveArgs,
}

/// A status as JSON: code, message and its metadata (headers or trailers).
fn status_json(status: &Status) -> Value {
    json!({
        "code": status.code() as i32,
        "message": status.message(),
        "metadata": metadata_json(status.metadata()),
    })
}

/// The ASCII entries of `metadata`.
fn metadata_json(metadata: &MetadataMap) -> Value {
    let entries: serde_json::Map<String, Value> = metadata
        .iter()
        .filter_map(|entry| match entry {
            tonic::metadata::KeyAndValueRef::Ascii(key, value) => Some((
                key.as_str().to_owned(),
                Value::from(value.to_str().unwrap_or_default()),
            )),
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect();
    Value::Object(entries)
}

/// `note` with the metadata of `--header`.
fn unary_request(args: &GrpcArgs, note: Note) -> anyhow::Result<tonic::Request<Note>> {
    let mut request = tonic::Request::new(note);
    for header in &args.headers {
        let (name, value) = header
            .split_once('=')
            .with_context(|| format!("--header {header:?} is not NAME=VALUE"))?;
        let name: tonic::metadata::MetadataKey<tonic::metadata::Ascii> = name
            .parse()
            .with_context(|| format!("--header name {name:?}"))?;
        let value = value
            .parse()
            .with_context(|| format!("--header value {value:?}"))?;
        request.metadata_mut().insert(name, value);
    }
    Ok(request)
}

/// Makes the call and prints what came back as one JSON object.
pub async fn run(args: GrpcArgs) -> anyhow::Result<()> {
    let uri: http::Uri = args.url.parse().context("the server URL")?;
    let host = uri.host().context("a host in the URL")?;
    let port = uri.port_u16().unwrap_or(80);
    let resolver = args.resolve.resolver()?;
    let addr = *resolver
        .resolve(host, port)
        .await?
        .first()
        .with_context(|| format!("no address for {host}"))?;
    // Connect to the address, present the URL's authority.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .context("the endpoint")?
        .origin(uri)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_millis(args.timeout_ms));
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut client = LabClient::new(channel);
    let note = |text: String, count: u32| Note {
        text,
        code: args.code,
        count,
        ..Default::default()
    };
    let report = match args.call {
        Call::Unary => match client
            .unary(unary_request(&args, note(args.text.clone(), 0))?)
            .await
        {
            Ok(answer) => {
                let metadata = metadata_json(answer.metadata());
                let answer = answer.into_inner();
                json!({"code": 0, "text": answer.text, "pod": answer.pod, "metadata": metadata})
            }
            Err(status) => status_json(&status),
        },
        Call::Count => {
            let mut report = json!({"received": 0, "in_order": true});
            match client.count(note(args.text.clone(), args.count)).await {
                Err(status) => report["status"] = status_json(&status),
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    let mut received = 0u32;
                    loop {
                        match stream.message().await {
                            Ok(Some(note)) => {
                                if note.count != received {
                                    report["in_order"] = false.into();
                                }
                                received += 1;
                            }
                            Ok(None) => {
                                report["status"] = json!({"code": 0});
                                break;
                            }
                            Err(status) => {
                                report["status"] = status_json(&status);
                                break;
                            }
                        }
                    }
                    report["received"] = received.into();
                }
            }
            report
        }
        Call::Collect => {
            let notes: Vec<Note> = (0..args.count).map(|i| note(format!("n{i}"), i)).collect();
            match client.collect(futures::stream::iter(notes)).await {
                Ok(summary) => {
                    let summary = summary.into_inner();
                    json!({"code": 0, "count": summary.count, "joined": summary.joined, "pod": summary.pod})
                }
                Err(status) => status_json(&status),
            }
        }
        Call::Chat => {
            // Each note goes out only after the previous answer arrived,
            // so both directions are open at once.
            let (sender, receiver) = tokio::sync::mpsc::channel::<Note>(1);
            let outbound = tokio_stream::wrappers::ReceiverStream::new(receiver);
            sender
                .send(note("c0".into(), 0))
                .await
                .context("first note")?;
            let mut report = json!({"replies": 0, "in_order": true});
            match client.chat(outbound).await {
                Err(status) => report["status"] = status_json(&status),
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    let mut replies = 0u32;
                    let mut sender = Some(sender);
                    loop {
                        match stream.message().await {
                            Ok(Some(reply)) => {
                                if reply.count != replies || reply.text != format!("re: c{replies}")
                                {
                                    report["in_order"] = false.into();
                                }
                                replies += 1;
                                if replies < args.count {
                                    if let Some(sender) = &sender {
                                        sender
                                            .send(note(format!("c{replies}"), replies))
                                            .await
                                            .context("next note")?;
                                    }
                                } else {
                                    // Closing our side ends the call.
                                    sender = None;
                                }
                            }
                            Ok(None) => {
                                report["status"] = json!({"code": 0});
                                break;
                            }
                            Err(status) => {
                                report["status"] = status_json(&status);
                                break;
                            }
                        }
                    }
                    drop(sender);
                    report["replies"] = replies.into();
                }
            }
            report
        }
    };
    println!("{report}");
    Ok(())
}
