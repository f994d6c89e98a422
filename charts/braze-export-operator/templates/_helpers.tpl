{{/* Name of the chart's objects. */}}
{{- define "bzx.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "bzx.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "bzx.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels that select the operator's pods. */}}
{{- define "bzx.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The ServiceAccount's name. */}}
{{- define "bzx.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "bzx.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The watched namespaces, comma-separated (watchNamespace, then watchNamespaces); empty: all. */}}
{{- define "bzx.watchNamespaces" -}}
{{- $all := .Values.watchNamespaces | default list -}}
{{- with .Values.watchNamespace }}{{ $all = prepend $all . }}{{ end -}}
{{- $all | uniq | join "," -}}
{{- end -}}
