// Renders Ollama chat prompts with Go's own text/template, for test_export_ollama.py: the same
// message handling as Ollama's server (the Modelfile's SYSTEM added when the first message is not a
// system message; consecutive same-role messages merged; .System = all system messages joined) and
// the same template options (missingkey=zero). Input: a JSON list of cases on stdin; output: a JSON
// list of rendered prompts (or "ERROR: ..." strings).
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role             string `json:"role"`
	Content          string `json:"content"`
	ReasoningContent string `json:"reasoning_content"`
}

type templateMessage struct {
	Role     string
	Content  string
	Thinking string
}

type testCase struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []message `json:"messages"`
	Think    *bool     `json:"think"`
}

func main() {
	var cases []testCase
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := make([]string, len(cases))
	for n, c := range cases {
		msgs := c.Messages
		if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
			msgs = append([]message{{Role: "system", Content: c.System}}, msgs...)
		}
		var system []string
		var collated []*templateMessage
		for _, m := range msgs {
			if m.Role == "system" {
				system = append(system, m.Content)
			}
			if len(collated) > 0 && collated[len(collated)-1].Role == m.Role && m.Role != "tool" {
				collated[len(collated)-1].Content += "\n\n" + m.Content
			} else {
				collated = append(collated, &templateMessage{Role: m.Role, Content: m.Content, Thinking: m.ReasoningContent})
			}
		}
		tmpl, err := template.New("").Option("missingkey=zero").Parse(c.Template)
		if err != nil {
			out[n] = "ERROR: " + err.Error()
			continue
		}
		var b strings.Builder
		err = tmpl.Execute(&b, map[string]any{
			"System":     strings.Join(system, "\n\n"),
			"Messages":   collated,
			"Tools":      nil,
			"Response":   "",
			"Think":      c.Think != nil && *c.Think,
			"ThinkLevel": "",
			"IsThinkSet": c.Think != nil,
		})
		if err != nil {
			out[n] = "ERROR: " + err.Error()
			continue
		}
		out[n] = b.String()
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
