// One-off check of a peftkit Modelfile with Ollama's own code: the Modelfile parser and the
// client's create request (FROM / ADAPTER files resolved and digested, PARAMETERs typed), Ollama's
// GGUF decoder on every file it would upload, and its chat template engine on conversations (the
// Modelfile's SYSTEM prepended as the chat handler does).
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/fs/ggml"
	"github.com/ollama/ollama/parser"
	"github.com/ollama/ollama/template"
)

func main() {
	var input struct {
		Modelfile     string          `json:"modelfile"`
		Conversations [][]api.Message `json:"conversations"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	f, err := os.Open(input.Modelfile)
	if err != nil {
		panic(err)
	}
	modelfile, err := parser.ParseFile(f)
	if err != nil {
		panic(err)
	}
	req, err := modelfile.CreateRequest(filepath.Dir(input.Modelfile))
	if err != nil {
		panic(err)
	}
	out := map[string]any{"from": req.From, "files": req.Files, "adapters": req.Adapters,
		"parameters": req.Parameters, "system": req.System, "template": req.Template}
	files := map[string]any{}
	for _, group := range []map[string]string{req.Files, req.Adapters} {
		for name := range group {
			path := filepath.Join(filepath.Dir(input.Modelfile), name)
			if _, err := os.Stat(path); err != nil {
				path = name
			}
			fh, err := os.Open(path)
			if err != nil {
				panic(err)
			}
			decoded, err := ggml.Decode(fh, -1)
			if err != nil {
				panic(err)
			}
			kv := decoded.KV()
			files[name] = map[string]any{"architecture": kv.Architecture(), "type": kv.Kind(),
				"tensors": len(decoded.Tensors().Items()), "context_length": kv.ContextLength()}
			fh.Close()
		}
	}
	out["decoded"] = files
	if req.Template != "" {
		tmpl, err := template.Parse(req.Template)
		if err != nil {
			panic(err)
		}
		prompts := []string{}
		for _, msgs := range input.Conversations {
			if msgs[0].Role != "system" && req.System != "" {
				msgs = append([]api.Message{{Role: "system", Content: req.System}}, msgs...)
			}
			var b bytes.Buffer
			if err := tmpl.Execute(&b, template.Values{Messages: msgs}); err != nil {
				panic(err)
			}
			prompts = append(prompts, b.String())
		}
		out["prompts"] = prompts
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
